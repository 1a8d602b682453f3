"""metadata_store.py: captions grouped in first-seen order, sidecars joined (a later line wins), images checked, and
the temporary SQLite file removed."""

import pytest

from diffusion_model.metadata_store import MetadataStore


def test_groups_join_and_check(tmp_path):
    """Captions of one image on lines 1 and 4 come out together, in the order of first lines; a later sidecar line
    for a name replaces an earlier one; a name that is not valid text is counted, not stored; a missing image is
    marked on each of its lines and left out."""
    (tmp_path / "b.jpg").touch()
    (tmp_path / "a.jpg").touch()
    with MetadataStore(tmp_path) as store:
        assert store.add_lines([(1, "b.jpg", "b one"), (2, "a.jpg", "a one"), (3, "gone.jpg", "x"),
                                (4, "b.jpg", "b two"), (6, "gone.jpg", "y")]) == 5
        assert store.add_sidecar("sources", [("b.jpg", "old"), ("\ud800", "bad"), ("b.jpg", "new")])
        assert not store.add_sidecar("metadata", [])
        store.check_images(str(tmp_path), conditioned=False)
        assert [(p.line, p.reason) for p in store.problems()] == [(3, "image not found"), (6, "image not found")]
        assert store.kept() == (2, True)
        assert list(store.records()) == [("b.jpg", ["b one", "b two"], "new", None, None),
                                         ("a.jpg", ["a one"], None, None, None)]
        assert store.is_listed(str(tmp_path / "a.jpg")) and not store.is_listed(str(tmp_path / "gone.jpg"))
        temporary = store.path
        assert temporary.parent == tmp_path and temporary.name.endswith(".tmp")
    assert not temporary.exists()


def test_file_is_removed_after_an_error(tmp_path):
    with pytest.raises(ValueError):
        with MetadataStore(tmp_path) as store:
            store.add_sidecar("captions", [])
    assert list(tmp_path.iterdir()) == []
