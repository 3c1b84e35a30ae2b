"""conftest gives tests their markers from the fixtures they use (issue #14 item 6)."""
from tests.conftest import markers_for


def test_markers_follow_fixtures():
    assert markers_for(["tmp_path", "qemu"]) == {"interop"}
    assert markers_for(["qtbot", "window"]) == {"gui"}
    assert markers_for(["qapp"]) == {"gui"}
    assert markers_for(["corpus", "qemu"]) == {"corpus", "interop"}
    assert markers_for(["tmp_path"]) == set()


def test_a_qemu_test_is_marked_interop(qemu, request):
    assert request.node.get_closest_marker("interop") is not None
    assert request.node.get_closest_marker("gui") is None


def test_a_qtbot_test_is_marked_gui(qtbot, request):
    assert request.node.get_closest_marker("gui") is not None


def test_variant_ids_are_words(request, pytestconfig):
    from tests.conftest import pytest_make_parametrize_id
    from vdgui.vd import ImageFlags
    assert pytest_make_parametrize_id(pytestconfig, ImageFlags.FIXED, "flags") == "fixed"
    assert pytest_make_parametrize_id(pytestconfig, ImageFlags.SPLIT_2G | ImageFlags.FIXED,
                                      "flags") == "fixed,split2g"
    assert pytest_make_parametrize_id(pytestconfig, 3, "n") is None
