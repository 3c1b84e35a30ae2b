"""The "Compact / Sparsify" action: the dialog, its dry run (a job), then the chosen job."""
from __future__ import annotations

from vdgui.jobs import tasks


def compact_or_sparsify(ops, path: str | None = None):
    """Open the dialog for the current image (or ``path``); returns the job started, or None."""
    from .dialogs.sparsify import SparsifyDialog
    if path is None and len(ops.w.selected_nodes()) > 1:
        return ops.compact_selected()           # several images: compact each
    node = ops.dialog_node(path)
    if node is None:
        return None
    dlg = SparsifyDialog(node.name, ops.w)
    fmt = node.record.format
    measure = tasks.sparsify_job(node.path, format=fmt, key=ops.chain_key(node), dry_run=True)
    measure.signals.failed.connect(lambda j, message, tb: dlg.set_error(message))
    ops.start_job(measure, dlg.set_report)
    dlg.measure_job = measure
    p = ops.run_dialog(dlg)
    if p is None:
        if not measure.finished:
            measure.cancel()
        return None
    if p.mode == "compact":
        job = tasks.compact_job(node.path, format=fmt, key=ops.chain_key(node))
    else:
        job = tasks.sparsify_job(node.path, format=fmt, key=ops.chain_key(node),
                                 dynamic=p.dynamic)
        ops.retry_on_failure(job, f"Sparsifying {node.name} failed",
                             lambda: compact_or_sparsify(ops, node.path))
    return ops.start_job(job, lambda res, p=node.path: ops.rescan([p]))
