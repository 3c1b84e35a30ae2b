"""Merge: shows the chain, lets the user pick source and target, says which files will be
deleted and how much space is needed, and refuses merges that would break other images."""
from __future__ import annotations

import html
import os

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFormLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QVBoxLayout,
)

from vdgui.vd import format_size

from ..icons import format_icon, icon
from .common import MessageArea, free_space, ok_cancel
from .params import MergeParams


def merge_chain(node) -> list:
    """The chain the merge dialog offers: base → … → node → (only child → …)."""
    chain = node.ancestors() + [node]
    n = node
    while len(n.children) == 1:
        n = n.children[0]
        chain.append(n)
    return chain


def merge_plan(chain: list, source, target, busy: set | None = None) -> dict:
    """What merging ``source`` into ``target`` does: files deleted, space needed, problems."""
    busy = busy or set()
    si, ti = chain.index(source), chain.index(target)
    out = {"errors": [], "deleted": [], "needed": 0, "direction": "", "reparented": []}
    if si == ti:
        out["errors"].append("Choose two different images")
        return out
    lo, hi = min(si, ti), max(si, ti)
    span = chain[lo:hi + 1]
    folded = [n for n in span if n is not target]
    out["deleted"] = folded
    out["direction"] = "forward" if si < ti else "backward"
    # (image, its new parent or None for a base): what the merge relinks
    if si < ti:       # forward: the target takes the place of the folded span
        out["reparented"] = [(target, chain[lo - 1] if lo > 0 else None)]
    else:             # backward: whatever sat on the span's top now sits on the target
        out["reparented"] = [(c, target) for c in chain[hi].children]
    # the data of the folded images lands in target: at most their allocated size
    out["needed"] = sum(n.record.file_size or 0 for n in folded)
    on_path = set(id(n) for n in chain)
    for n in folded:
        others = [c for c in n.children if id(c) not in on_path]
        if others:
            out["errors"].append(
                f"{n.name} will be deleted but {', '.join(c.name for c in others)} "
                f"also depend{'s' if len(others) == 1 else ''} on it"
            )
    if si > ti:  # backward: target's content changes; every other child of target breaks
        others = [c for c in target.children if id(c) not in on_path]
        if others:
            out["errors"].append(
                f"Merging into {target.name} changes it, but "
                f"{', '.join(c.name for c in others)} also depend on it"
            )
    for n in span:
        if n.path in busy:
            out["errors"].append(f"{n.name} is busy: a running job is using it")
        if not n.accessible:
            out["errors"].append(f"{n.name} is inaccessible: {n.record.error}")
    return out


class MergeDialog(QDialog):
    def __init__(self, node, parent=None, busy: set | None = None):
        super().__init__(parent)
        self.node = node
        self.busy = busy or set()
        self.setWindowTitle(f"Merge Images of the Chain of {node.name}")
        self.setWindowIcon(icon("merge"))
        self.chain = merge_chain(node)
        self.list = QListWidget()
        self.list.setSelectionMode(QListWidget.NoSelection)
        self.list.setFocusPolicy(Qt.NoFocus)
        for i, n in enumerate(self.chain):
            it = QListWidgetItem(
                format_icon(n.record.device_type, n.record.format),
                f"{'   ' * i}{'└ ' if i else ''}{n.name}   "
                f"({format_size(n.record.file_size or 0)} on disk)",
            )
            it.setToolTip(n.path)
            self.list.addItem(it)
        self.list.setMaximumHeight(min(24 * len(self.chain) + 8, 200))
        self.source = QComboBox()
        self.target = QComboBox()
        for n in self.chain:
            self.source.addItem(n.name, n.path)
            self.target.addItem(n.name, n.path)
        si = self.chain.index(node)
        self.source.setCurrentIndex(si)
        self.target.setCurrentIndex(si - 1 if si > 0 else min(si + 1, len(self.chain) - 1))
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.RichText)
        self.messages = MessageArea()
        form = QFormLayout()
        form.addRow("Merge &from (source):", self.source)
        form.addRow("Merge &into (target):", self.target)
        self.buttons, self.ok = ok_cancel(self, "Merge")
        lay = QVBoxLayout(self)
        self.chain_label = QLabel("Chain (base at the top):")
        lay.addWidget(self.chain_label)
        lay.addWidget(self.list)
        lay.addLayout(form)
        lay.addWidget(self.summary)
        lay.addWidget(self.messages)
        lay.addStretch(1)  # spare height below the text, not between the rows
        lay.addWidget(self.buttons)
        self.source.currentIndexChanged.connect(self._source_changed)
        self.target.currentIndexChanged.connect(self.validate)
        self.validate()
        self.resize(560, self.sizeHint().height())

    def _source_changed(self, *_):
        """A new source retargets "Merge into" to its parent (its child for the base), the
        merge VirtualBox offers; the user can still pick another target."""
        si = self.source.currentIndex()
        ti = si - 1 if si > 0 else min(si + 1, len(self.chain) - 1)
        if self.target.currentIndex() != ti:
            self.target.setCurrentIndex(ti)  # validates
        else:
            self.validate()

    def set_source_target(self, source_path: str, target_path: str) -> None:
        self.source.setCurrentIndex(self.source.findData(source_path))
        self.target.setCurrentIndex(self.target.findData(target_path))

    def set_params(self, p: MergeParams) -> None:
        """What was chosen before (its job failed: change, retry)."""
        self.set_source_target(p.source, p.target)

    def plan(self) -> dict:
        return merge_plan(
            self.chain,
            self.chain[self.source.currentIndex()],
            self.chain[self.target.currentIndex()],
            self.busy,
        )

    def validate(self, *_):
        plan = self.plan()
        src = self.chain[self.source.currentIndex()]
        tgt = self.chain[self.target.currentIndex()]
        errors, warnings = list(plan["errors"]), []
        if plan["deleted"]:
            files = [f for n in plan["deleted"] for f in (n.record.files or [n.path])]
            names = ", ".join(html.escape(n.name) for n in plan["deleted"])
            self.summary.setText(
                f"The content of {names} is written into <b>{html.escape(tgt.name)}</b>"
                + (
                    " (which keeps its place in the chain)"
                    if plan["direction"] == "backward"
                    else ", which takes over their place in the chain"
                )
                + ". These files will be <b>deleted</b>:<br>"
                + "<br>".join(f"&nbsp;&nbsp;• {html.escape(f)}" for f in files)
                + "".join(
                    f"<br>{html.escape(c.name)} "
                    + (
                        f"will then be a child of {html.escape(p.name)}"
                        if p is not None
                        else "will then be a base image (no parent)"
                    )
                    + "."
                    for c, p in plan["reparented"]
                )
                + f"<br>Space needed: up to <b>{format_size(plan['needed'])}</b> in "
                f"{html.escape(os.path.dirname(tgt.path))}."
            )
            free = free_space(tgt.path)
            if free is not None and plan["needed"] > free:
                warnings.append(
                    f"Only {format_size(free)} are free there; the merge may run out of space"
                )
        else:
            self.summary.setText("")
        self.messages.show_messages(errors, warnings)
        self.ok.setEnabled(not errors)
        self._src, self._tgt = src, tgt

    def params(self) -> MergeParams:
        plan = self.plan()
        return MergeParams(
            source=self._src.path,
            target=self._tgt.path,
            deleted=[n.path for n in plan["deleted"]],
            paths=[n.path for n in self.chain],
        )
