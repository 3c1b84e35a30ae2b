"""Operations on a Disk (modelled on vd.h's VDMerge, VDCopyEx, VDCompact, VDResize, VDRepair).

Each is a function taking a progress callback ``progress(done, total)``; returning False from it
cancels. A backend gains an operation by implementing the hook declared in
:class:`~vdgui.vd.backend.Operation` on its Image class; the operation itself never names formats.
"""
