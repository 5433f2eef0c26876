"""fgs_common.artifact_store.ArtifactStore: content-addressed images and classifier folders per tenant."""

from __future__ import annotations

import hashlib
import threading

import pytest

from fgs_common.artifact_store import ArtifactStore


def files_under(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_the_same_image_twice_is_one_object(tmp_path):
    store = ArtifactStore(tmp_path)
    image_id = store.put_image("alpha", b"png bytes", "png")
    assert image_id == hashlib.sha256(b"png bytes").hexdigest()
    assert store.put_image("alpha", b"png bytes", "png") == image_id
    assert files_under(tmp_path) == [f"tenants/alpha/images/{image_id}.png"]
    assert store.image_path("alpha", image_id).read_bytes() == b"png bytes"


def test_images_are_the_tenants_own(tmp_path):
    store = ArtifactStore(tmp_path)
    image_id = store.put_image("alpha", b"jpeg bytes", "jpeg")
    assert store.image_path("alpha", image_id).name == f"{image_id}.jpeg"
    assert store.image_path("beta", image_id) is None
    assert store.image_path("alpha", "../../" + image_id) is None  # not an id: never a path
    assert store.image_path("alpha", "0" * 64) is None


@pytest.mark.parametrize("tenant", ["..", "a/b", "", "x" * 65])
def test_a_tenant_name_that_is_not_a_folder_name_is_refused(tmp_path, tenant):
    with pytest.raises(ValueError, match="invalid tenant name"):
        ArtifactStore(tmp_path).put_image(tenant, b"x", "png")
    assert files_under(tmp_path) == []


def test_unsupported_image_format_and_archive_name_are_refused(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="unsupported image format 'gif'"):
        store.put_image("alpha", b"x", "gif")
    with pytest.raises(ValueError, match="archive name must be one of"):
        store.put_classifier("alpha", b"a", "model.pkl", b"{}", None)
    assert files_under(tmp_path) == []


def test_a_classifier_is_one_folder_whose_id_covers_archive_spec_and_statistics(tmp_path):
    store = ArtifactStore(tmp_path)
    plain = store.put_classifier("alpha", b"archive", "archive.pt", b'{"num_classes": 2}', None)
    upload = tmp_path / "stats-upload"  # the API's scratch copy of an upload, on the store's filesystem
    upload.write_bytes(b"stats")
    with_stats = store.put_classifier("alpha", b"archive", "archive.pt", b'{"num_classes": 2}', upload)
    assert not upload.exists()  # moved into the folder, not copied
    other_spec = store.put_classifier("alpha", b"archive", "archive.pt", b'{"num_classes": 3}', None)
    assert len({plain, with_stats, other_spec}) == 3
    assert store.put_classifier("alpha", b"archive", "archive.pt", b'{"num_classes": 2}', None) == plain
    folder = store.classifier_dir("alpha", with_stats)
    assert sorted(p.name for p in folder.iterdir()) == ["archive.pt", "hardness.safetensors", "meta.json", "spec.json"]
    assert (folder / "hardness.safetensors").read_bytes() == b"stats"
    assert ArtifactStore.classifier_archive(folder).name == "archive.pt"
    assert store.classifier_dir("beta", plain) is None
    assert store.classifier_dir("alpha", "not-an-id") is None
    stored = sorted(p.name for p in (tmp_path / "tenants/alpha/classifiers").iterdir())
    assert stored == sorted([plain, with_stats, other_spec])


def test_concurrent_uploads_of_one_classifier_leave_one_folder(tmp_path):
    store = ArtifactStore(tmp_path)
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def upload():
        barrier.wait()
        ids.append(store.put_classifier("alpha", b"a" * 100_000, "archive.pt2", b"{}", None))

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    folder = f"tenants/alpha/classifiers/{ids[0]}"
    assert files_under(tmp_path) == [f"{folder}/archive.pt2", f"{folder}/meta.json", f"{folder}/spec.json"]
