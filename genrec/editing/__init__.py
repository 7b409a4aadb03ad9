"""GenRecEdit: training-free injection of cold-start items into a TIGER T5 (specs/genrecedit.md)."""

from genrec.editing.closed_form import KeyResidualStats, closed_form_update, solve_update
from genrec.editing.covariance import model_fingerprint, preserved_covariances
from genrec.editing.editor import EditConfig, EditReport, GenRecEditor
from genrec.editing.edits import PositionEdits, SidTableMismatchError
from genrec.editing.knowledge import (
    EditKnowledge,
    SidHistoryEncoder,
    nearest_neighbours,
    pseudo_knowledge,
    true_history_knowledge,
)
from genrec.editing.probe import choose_layers, probe_accuracy, probe_accuracy_matrix
from genrec.editing.values import ValueConfig, ValueResult, optimise_values

__all__ = [
    "EditConfig",
    "EditKnowledge",
    "EditReport",
    "GenRecEditor",
    "KeyResidualStats",
    "PositionEdits",
    "SidHistoryEncoder",
    "SidTableMismatchError",
    "ValueConfig",
    "ValueResult",
    "choose_layers",
    "closed_form_update",
    "model_fingerprint",
    "nearest_neighbours",
    "optimise_values",
    "preserved_covariances",
    "probe_accuracy",
    "probe_accuracy_matrix",
    "pseudo_knowledge",
    "solve_update",
    "true_history_knowledge",
]
