"""Stand-in for ComfyUI `execution.py`: running a prompt (an API-format graph) the way the executor does.

Modelled on ComfyUI (2026-01) `execution.py`: `validate_prompt` refuses a prompt without an output node
("Prompt has no outputs"); `get_input_data` turns links into the producer's output lists and widget
values into one-item lists; `_map_node_over_list` calls the node once per list index (or once with whole
lists when INPUT_IS_LIST) and, when an input value is an ExecutionBlocker, does not call the node but
passes the blocker on (`execution_block_cb`: a blocker with a message is reported once as
"Execution Blocked: <message>" and continues silently); `get_output_from_returns` reads {"ui", "result"}
dicts and widens a returned blocker to every output; `merge_result_data` concatenates list outputs.
"""
from __future__ import annotations

import nodes
import torch
from comfy_execution.graph_utils import ExecutionBlocker


class PromptError(Exception):
    """What validate_prompt answers for a prompt it refuses."""


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def validate_prompt(prompt: dict) -> list[str]:
    """The output nodes to execute; refuses a prompt without one."""
    outputs = [node_id for node_id, node in prompt.items()
               if getattr(nodes.NODE_CLASS_MAPPINGS[node["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise PromptError("Prompt has no outputs")
    return outputs


def get_input_data(inputs: dict, outputs: dict) -> dict:
    data = {}
    for name, value in inputs.items():
        data[name] = outputs[value[0]][value[1]] if _is_link(value) else [value]
    return data


def _map_node_over_list(obj, input_data_all: dict, func: str, execution_block_cb):
    if getattr(obj, "INPUT_IS_LIST", False):
        calls = [input_data_all]
    else:
        longest = max((len(v) for v in input_data_all.values()), default=0)
        calls = [{k: v[i if len(v) > i else -1] for k, v in input_data_all.items()} for i in range(longest)]
    results, called = [], 0
    for inputs in calls:
        block = None
        for value in inputs.values():
            if isinstance(value, ExecutionBlocker):
                block = execution_block_cb(value)
                break
        if block is None:
            results.append(getattr(obj, func)(**inputs))
            called += 1
        else:
            results.append(block)
    return results, called


def get_output_from_returns(returns: list, obj) -> tuple[list, list]:
    results, uis = [], []
    for r in returns:
        if isinstance(r, dict):
            if "ui" in r:
                uis.append(r["ui"])
            if "result" in r:
                result = r["result"]
                results.append(tuple([result] * len(obj.RETURN_TYPES)) if isinstance(result, ExecutionBlocker)
                               else result)
        else:
            results.append(tuple([r] * len(obj.RETURN_TYPES)) if isinstance(r, ExecutionBlocker) else r)
    return results, uis


def merge_result_data(results: list, obj) -> list:
    is_list = getattr(obj, "OUTPUT_IS_LIST", [False] * len(obj.RETURN_TYPES))
    merged = []
    for i, as_list in enumerate(is_list):
        if as_list:
            merged.append([x for r in results for x in (r[i] if isinstance(r[i], list) else [r[i]])])
        else:
            merged.append([r[i] for r in results])
    return merged


class Run:
    """What one prompt's execution produced: outputs per node, UI data, executed nodes, reported blocks."""

    def __init__(self):
        self.outputs: dict = {}
        self.ui: dict = {}
        self.executed: list[str] = []
        self.blocked_messages: list[tuple[str, str]] = []


def execute(prompt: dict) -> Run:
    """Run every node the output nodes need, producers first, inside inference mode as ComfyUI does."""
    run = Run()
    wanted = validate_prompt(prompt)

    def visit(node_id: str) -> None:
        if node_id in run.outputs:
            return
        node = prompt[node_id]
        for value in node["inputs"].values():
            if _is_link(value):
                visit(value[0])
        cls = nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
        obj = cls()

        def execution_block_cb(block):
            if block.message is not None:
                run.blocked_messages.append((node_id, f"Execution Blocked: {block.message}"))
                return ExecutionBlocker(None)
            return block

        with torch.inference_mode():
            returns, called = _map_node_over_list(obj, get_input_data(node["inputs"], run.outputs), cls.FUNCTION,
                                                  execution_block_cb)
        results, uis = get_output_from_returns(returns, obj)
        if called:
            run.executed.append(node_id)
        run.outputs[node_id] = merge_result_data(results, obj) if cls.RETURN_TYPES else []
        if uis:
            run.ui[node_id] = uis

    for node_id in wanted:
        visit(node_id)
    return run
