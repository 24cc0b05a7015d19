# Thin wrappers; the README shows the raw commands.
.PHONY: install test test-slow quality style demo plan bench docs

install:
	pip install torch==2.13.0
	pip install -e ".[test]"

test:
	python -m pytest

test-slow:
	python -m pytest -m slow

quality:
	ruff check . && ruff format --check . && lint-imports

style:
	ruff check --fix . && ruff format .

demo:
	accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m qsr_hf.training.train recipes/demo/qsr.yaml --overwrite_output_dir true

plan:
	qsr-hf plan recipes/vit_b16_imagenet1k/qsr.yaml

bench:
	python benchmarks/averaging.py

docs:
	mkdocs build --strict
