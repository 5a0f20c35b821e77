"""Stand-in for ComfyUI `comfy_execution/graph_utils.py`: ExecutionBlocker."""


class ExecutionBlocker:
    """graph_utils.ExecutionBlocker: returned as an output, it blocks every node that uses it.

    With a message the executor reports "Execution Blocked: <message>" once and blocks silently after;
    with None it blocks silently.
    """

    def __init__(self, message):
        self.message = message
