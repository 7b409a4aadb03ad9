"""Input paths written in a config file are relative to that file, not to wherever the command is launched.

``genrec <command> --config FILE`` reads FILE, rewrites the relative values of the input fields below (data files,
SID tables, checkpoints to start from) against FILE's folder, and hands the command a resolved copy (so
``--print_config`` and the saved ``config.yaml`` show the absolute paths that were used). Outputs
(``default_root_dir``, ``save_dir``, ``output_dir``, ``prepared_dir``, caches …) stay relative to the working
directory: a run writes where it is launched, never next to a shared or installed config. Paths given on the command
line are relative to the current directory, as in any shell command. URLs (``hf://…``) and the checkpoint aliases
``best`` / ``last`` are left alone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

PATH_FIELDS = frozenset({
    "root", "reviews_path", "meta_path", "sid_table_path", "embeddings_path", "cf_embeddings_path", "init_from",
    "ckpt_path", "tiger_ckpt", "sasrec_ckpt", "items_path",
})
_KEEP = ("best", "last", "hpc", "registry")


def _resolve_value(value, base: Path):
    if not isinstance(value, str) or not value or "://" in value or value in _KEEP or value.startswith("registry:"):
        return value
    if os.path.isabs(os.path.expanduser(value)):
        return value
    return os.path.normpath(base / value)


def resolve_paths(node, base: Path):
    """A copy of a parsed YAML tree with the relative values of :data:`PATH_FIELDS` joined to ``base``."""
    if isinstance(node, dict):
        return {k: (_resolve_value(v, base) if k in PATH_FIELDS else resolve_paths(v, base)) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_paths(v, base) for v in node]
    return node


def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="genrec_configs_"))
    atexit.register(shutil.rmtree, d, True)
    return d


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config FILE`` (or ``--config=FILE``) replaced by a path-resolved copy of FILE."""
    import yaml

    out, work, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        path = None
        if arg == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        src = Path(path)
        if not src.is_file():  # let the parser report it in its own words
            out += ["--config", path]
            continue
        try:
            tree = yaml.safe_load(src.read_text())
        except yaml.YAMLError:
            tree = None  # the parser names the syntax error itself
        if not isinstance(tree, dict):
            out += ["--config", path]
            continue
        work = work or _workdir()
        dst = work / f"{len(out):03d}_{src.name}"
        dst.write_text(yaml.safe_dump(resolve_paths(tree, src.parent.absolute()), sort_keys=False))
        out += ["--config", str(dst)]
    return out
