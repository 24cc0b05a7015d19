"""The validation split's rule, measured: files, bytes and the largest file's share of each split, with the rule
(generated files left out, files cut to ``MAX_FILE_CHARS``) and without it (docs/language-models.md's table).

    python benchmarks/corpus_split.py      # prints the table (a few seconds)
"""

from qsr_hf.training.corpus import load_stdlib_corpus


def describe(split: str, rule: bool) -> str:
    kwargs = {} if rule else {"exclude_generated": False, "max_file_chars": None}
    ds = load_stdlib_corpus(split, **kwargs)
    sizes = [len(t.encode()) for t in ds["text"]]
    total = sum(sizes)
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    share = 100 * sizes[largest] / total
    label = f"{split}, {'after' if rule else 'before'}"
    return f"| {label} | {len(sizes)} | {total:,} | `{ds['path'][largest]}` ({share:.1f}%) |"


if __name__ == "__main__":
    print("| split | files | bytes | largest file (share of the split) |\n| --- | --- | --- | --- |")
    for split in ("train", "validation"):
        for rule in (False, True):
            print(describe(split, rule))
