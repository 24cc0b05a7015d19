"""`SingleProcessEngine`: one process, nothing to switch off and nothing to average; training runs as usual."""

from qsr_hf.engines.base import Engine


class SingleProcessEngine(Engine):
    """Adapter for a run with one process (or a DDP wrapper over a group of one).

    Args:
        module (`nn.Module`): the model.
    """
