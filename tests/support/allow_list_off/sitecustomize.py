"""Put on PYTHONPATH, this turns the operator allow-list (fgs_classifier.graph_check) off in every Python process
started with it: the API, its classifier check, the worker and the classifier's confined process (PYTHONPATH is
one of the variables the sandbox passes on). tests/test_worker_confined_classifier.py uses it to run issue 19's
out-of-bounds classifier as if it had got past the allow-list, as it did before the allow-list refused it: the
run-time confinement must hold on its own. Test-only; never on a deployment's path."""

import importlib.abc
import importlib.util
import sys

_TARGET = "fgs_classifier.graph_check"


class _AllowListOff(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module, then patch it once it has run
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.check_script_module = lambda module: None
            module.check_exported_program = lambda program: None

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AllowListOff())
