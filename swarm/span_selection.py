"""Which span a new node should serve when the volunteer did not say: the least-covered window."""

from __future__ import annotations

from .records import ServerRecord


def coverage(records: list[ServerRecord], num_layers: int) -> list[int]:
    """How many online nodes serve each layer."""
    counts = [0] * num_layers
    for record in records:
        if record.online:
            for layer in range(record.start, min(record.end, num_layers)):
                counts[layer] += 1
    return counts


def choose_span(records: list[ServerRecord], num_layers: int, num_blocks: int) -> tuple[int, int]:
    """The window of ``num_blocks`` layers whose weakest layer is least covered.

    Ties go to the window with the smallest total coverage, then to the earliest one, so nodes joining an empty
    swarm one after another tile the model from layer 0.
    """
    num_blocks = max(1, min(num_blocks, num_layers))
    counts = coverage(records, num_layers)
    best = min(range(num_layers - num_blocks + 1),
               key=lambda s: (min(counts[s:s + num_blocks]), sum(counts[s:s + num_blocks]), s))
    return best, best + num_blocks


def missing_spans(records: list[ServerRecord], num_layers: int) -> list[tuple[int, int]]:
    """Maximal runs of layers no online node serves, as half-open spans."""
    counts = coverage(records, num_layers)
    spans, start = [], None
    for layer, count in enumerate(counts + [1]):
        if count == 0 and start is None:
            start = layer
        elif count > 0 and start is not None:
            spans.append((start, layer))
            start = None
    return spans
