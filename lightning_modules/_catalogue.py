"""Checkpoints carry the catalogue fingerprint of their training data; loading one on other data is refused."""

from __future__ import annotations

from genrec.data.fingerprint import catalogue_fingerprint, check_catalogue

CHECKPOINT_KEY = "genrec_catalogue"


class CatalogueBound:
    """Mixin for LightningModules whose item indices only mean something for one catalogue."""

    _catalogue: dict | None = None  # fingerprint of the data the weights were trained on (or restored with)

    def _datamodule_dataset(self):
        trainer = getattr(self, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return dm.load() if dm is not None and hasattr(dm, "load") else None

    def bind_catalogue(self, dataset) -> None:
        """Check ``dataset`` against the fingerprint of restored weights, or adopt it for fresh weights."""
        if self._catalogue is not None:
            check_catalogue(self._catalogue, dataset.table.item_ids, f"{type(self).__name__} checkpoint")
        else:
            self._catalogue = catalogue_fingerprint(dataset.table.item_ids)

    def save_catalogue(self, checkpoint: dict) -> None:
        if self._catalogue is None:
            ds = self._datamodule_dataset()
            if ds is not None:
                self._catalogue = catalogue_fingerprint(ds.table.item_ids)
        if self._catalogue is not None:
            checkpoint[CHECKPOINT_KEY] = dict(self._catalogue)

    def load_catalogue(self, checkpoint: dict) -> None:
        self._catalogue = checkpoint.get(CHECKPOINT_KEY)
        ds = self._datamodule_dataset()
        if ds is not None:
            self.bind_catalogue(ds)
