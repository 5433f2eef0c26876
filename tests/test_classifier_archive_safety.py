"""Classifier archives that would run code or read host files are refused before anything of them runs; normal
torch.export archives (static and dynamic batch) load and back-propagate. In-process: the vetting and the loader
themselves (the upload and the worker paths are in test_service_classifier_sandbox.py)."""

from __future__ import annotations

import pytest
import torch

from fgs_classifier.graph_check import check_script_module
from fgs_classifier.registry import load_classifier
from fgs_common.classifier_archive import inspect_archive
from fgs_common.exceptions import ArchiveTooLarge, UnsafeClassifier, UnsafeClassifierArchive
from support import hostile_archives as hostile


@pytest.fixture(scope="module")
def static_pt2(tmp_path_factory):
    return hostile.export_archive(tmp_path_factory.mktemp("pt2") / "static.pt2", dynamic_batch=False)


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory):
    return hostile.export_archive(tmp_path_factory.mktemp("pt2") / "dynamic.pt2", dynamic_batch=True)


@pytest.mark.parametrize(
    "craft, named",
    [
        (hostile.pt2_with_pickled_weight, "use_pickle"),
        (hostile.pt2_with_code_in_shape_expression, "shape expression"),
        (hostile.pt2_with_pkl_member, "objects.pkl"),
    ],
    ids=["pickled-weight", "code-in-shape-expression", "pkl-member"],
)
def test_hostile_pt2_is_refused_and_nothing_runs(static_pt2, tmp_path, craft, named):
    marker = tmp_path / "code-ran"
    archive = craft(static_pt2, tmp_path / "hostile.pt2", marker)
    with pytest.raises(UnsafeClassifierArchive, match=named):
        inspect_archive(archive, max_unpacked_bytes=1 << 30)
    with pytest.raises(UnsafeClassifier, match=named):
        load_classifier(archive, hostile.SPEC)
    assert not marker.exists()


def test_pickled_sample_inputs_are_never_read(static_pt2, tmp_path):
    """torch.export.load retries sample inputs with weights_only=False; the loader gives it none to read."""
    marker = tmp_path / "code-ran"
    archive = hostile.pt2_with_pickled_sample_inputs(static_pt2, tmp_path / "hostile.pt2", marker)
    load_classifier(archive, hostile.SPEC)
    assert not marker.exists()


@pytest.mark.parametrize("which", ["static", "dynamic"])
def test_normal_exports_load_run_any_batch_and_backpropagate(static_pt2, dynamic_pt2, which):
    archive = static_pt2 if which == "static" else dynamic_pt2
    classifier = load_classifier(archive, hostile.SPEC)
    assert classifier.batch_size == (2 if which == "static" else None)
    torch.manual_seed(0)
    model = hostile.TinyClassifier().eval()  # the weights export_archive saved (same seed)
    pixels = torch.rand(5, 3, 32, 32, requires_grad=True)  # 5: not a multiple of the static batch of 2
    logits, embedding = classifier(pixels)
    expected_logits, expected_embedding = model(classifier.preprocess(pixels))
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(embedding, expected_embedding)
    logits.logsumexp(dim=1).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_torchscript_reading_a_file_is_refused_before_load(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN-4711")
    archive = hostile.script_archive(tmp_path / "reads.pt", hostile.ReadsFile(str(secret), 10))
    with pytest.raises(UnsafeClassifierArchive, match="from_file"):
        inspect_archive(archive, max_unpacked_bytes=1 << 30)
    with pytest.raises(UnsafeClassifier, match="from_file") as refused:
        load_classifier(archive, hostile.SPEC)
    assert "4711" not in str(refused.value) and str(list(b"TOKEN-4711")) not in str(refused.value)


def test_graph_check_refuses_file_operators_in_any_method_inlined(tmp_path):
    """The check on compiled graphs, behind the source scan: a helper method's from_file is found inlined."""

    class Helper(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.from_file("/etc/hostname", size=1, dtype=torch.uint8).float()

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.helper = Helper()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.helper(x) * 2

    with pytest.raises(UnsafeClassifierArchive, match="aten::from_file"):
        check_script_module(torch.jit.script(Outer()))
    check_script_module(torch.jit.script(hostile.TinyClassifier()))  # an ordinary classifier passes


def test_zip_bomb_is_refused_by_its_declared_size(tmp_path):
    archive = hostile.script_archive(tmp_path / "tiny.pt", hostile.TinyClassifier())
    bomb = hostile.with_zip_bomb(archive, tmp_path / "bomb.pt", unpacked_bytes=64 * 1024 * 1024)
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(ArchiveTooLarge, match="unpacks to"):
        inspect_archive(bomb, max_unpacked_bytes=32 * 1024 * 1024)


@pytest.mark.parametrize(
    "source, named",
    [
        ("x = torch.ops.c10d.allreduce_(y)", "namespace 'c10d'"),
        ("x = ops.profiler._record_function_enter(y)", "namespace 'profiler'"),
        ("x = getattr(torch, 'from_file')", "from_file"),
        ("x = torch.save(y, 'out')", "save"),
        ("p : __torch__.torch.classes.quantized.LinearPackedParamsBase", "custom class"),
    ],
    ids=["c10d", "profiler", "getattr-string", "save", "custom-class"],
)
def test_torchscript_code_scan_refuses_what_loading_could_run(source, named):
    """The scan runs before torch.jit.load, which compiles this code and runs its __setstate__."""
    from fgs_common.classifier_operators import check_torchscript_code

    check_torchscript_code("code/ok.py", b"x = ops.aten.relu(ops.prim.unchecked_cast(y))")
    with pytest.raises(UnsafeClassifierArchive, match=named):
        check_torchscript_code("code/hostile.py", source.encode())


@pytest.mark.parametrize(
    "expression, safe",
    [
        ("Symbol('s77', positive=True, integer=True)", True),
        ("2*s0 + FloorDiv(s1, 4) - Max(1, s0)", True),
        ("Eq(Mod(s0, 2), 0)", True),
        ("__import__('os').system('true')", False),
        ("exec(chr(112) + chr(33))", False),
        ("Symbol('s0').__class__", False),
        ("Symbol('s0', positive=chr(1))", False),
        ("lambda: 0", False),
    ],
)
def test_shape_expressions_are_arithmetic_only(expression, safe):
    """torch.export's deserializer hands these strings to sympy.sympify, which evaluates them as Python."""
    from fgs_common.classifier_operators import check_symbolic_expression

    if safe:
        check_symbolic_expression(expression)
    else:
        with pytest.raises(UnsafeClassifierArchive, match="shape"):
            check_symbolic_expression(expression)


@pytest.mark.stack  # the sandboxed check is a child process
def test_the_sandboxed_check_says_which_step_failed(tmp_path):
    """An unreadable spec is named as such, not blamed on the archive or on memory."""
    from fgs_common.classifier_sandbox import run_classifier_check
    from fgs_common.settings import Settings

    archive = tmp_path / "clf.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))), archive)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"num_classes": 2, "input_size": 8}')
    bad.write_text('{"num_classes": 2,')
    settings = Settings(_env_file=None)
    assert run_classifier_check(archive, good, None, settings, scratch=tmp_path).code == "ok"
    refused = run_classifier_check(archive, bad, None, settings, scratch=tmp_path)
    assert refused.code == "invalid_classifier_spec"
    assert refused.message.startswith("the classifier spec could not be read") and "damaged" not in refused.message


class _Features(torch.nn.Module):
    """What the memory-unsafe classifiers below share: (logits, embedding) of 3 features."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 10)

    def out(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(features), features


class _UnsafeIndex(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.zeros(x.shape[0], dtype=torch.long)
        return self.out(torch.ops.aten._unsafe_index(x, [index]).mean(dim=(2, 3)))


class _SparseConstructor(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.ones(1), [4]).to_dense()
        return self.out(x.mean(dim=(2, 3)) + dense.sum())


class _ToDense(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out(x.to_dense().mean(dim=(2, 3)))


class _AsStrided(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out(x.as_strided([x.shape[0], 3], [1, 1]))


class _SetStorage(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        borrowed = torch.empty(0)
        borrowed.set_(x)
        return self.out(borrowed.mean(dim=(2, 3)))


class _StorageOffset(_Features):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out(x.mean(dim=(2, 3)) + x.storage_offset())


@pytest.mark.parametrize(
    "module, operator",
    [
        (hostile.WritesOutOfBounds(), "aten::_sparse_coo_tensor_unsafe"),  # issue 19's finding
        (_UnsafeIndex(), "aten::_unsafe_index"),
        (_SparseConstructor(), "aten::sparse_coo_tensor"),
        (_ToDense(), "aten::to_dense"),
        (_AsStrided(), "aten::as_strided"),
        (_SetStorage(), "aten::set_"),
        (_StorageOffset(), "aten::storage_offset"),
    ],
    ids=["unsafe-sparse-finding", "unsafe-op", "sparse-constructor", "to-dense", "as-strided", "set", "storage"],
)
def test_graph_check_refuses_operators_that_reach_memory_unchecked(tmp_path, module, operator):
    """Every class of memory-unsafe operator is refused before the classifier runs (each module runs fine at the
    check's batch of 2 when scripted: only the allow-list stands between it and a worker)."""
    scripted = torch.jit.script(module)
    scripted(torch.rand(2, 3, 32, 32))  # runs: nothing else would have stopped it
    with pytest.raises(UnsafeClassifierArchive, match=operator):
        check_script_module(scripted)
    archive = hostile.script_archive(tmp_path / "unsafe.pt", module)
    with pytest.raises(UnsafeClassifier, match="out of bounds"):
        load_classifier(archive, hostile.SPEC)


def test_graph_check_refuses_raw_strides_in_an_export(tmp_path):
    path = tmp_path / "strided.pt2"
    torch.export.save(torch.export.export(_AsStrided(), (torch.rand(2, 3, 32, 32),)), str(path))
    with pytest.raises(UnsafeClassifier, match="aten::as_strided"):
        load_classifier(path, hostile.SPEC)
