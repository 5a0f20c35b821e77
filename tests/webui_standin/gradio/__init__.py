"""Test stand-in for the few gradio components a WebUI script's ui() builds; not gradio.

Every component made is appended to `created`, so tests can find the button and its click handler.
"""
from __future__ import annotations

created = []


class _Block:
    """A component or layout; keeps its keyword arguments (value, label, ...)."""

    def __init__(self, value=None, label=None, **kwargs):
        self.value = value
        self.label = label
        self.kwargs = kwargs
        self.handlers = []
        created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Blocks(_Block):
    pass


class Row(_Block):
    pass


class Column(_Block):
    pass


class Group(_Block):
    pass


class Accordion(_Block):
    pass


class Markdown(_Block):
    pass


class Checkbox(_Block):
    pass


class Textbox(_Block):
    pass


class Button(_Block):
    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        """Record the handler; tests call it as the browser's click would."""
        self.handlers.append((fn, inputs, outputs))
        return self


class Number(_Block):
    pass


class Radio(_Block):
    pass
