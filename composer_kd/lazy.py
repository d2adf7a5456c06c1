"""Names imported on first use: a package's exported names (PEP 562) and modules' former paths.

``import composer_kd`` and the ``composer-kd`` command's ``--help`` load neither torch nor Composer: each name
of ``composer_kd.__all__`` is imported from its module the first time it is looked up. A module that moved keeps
its former dotted path: importing that path imports the module where it lives now (:class:`ModuleAliases`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Mapping
from typing import Any, Optional

__all__ = ['ModuleAliases', 'lazy_exports']


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package whose names are imported on first use.

    Args:
        package (str): The package's name (its ``__name__``).
        exports (Mapping[str, str]): ``{name: module}``: where each exported name lives. A name whose module is
            ``<package>.<name>`` is that submodule itself.
        namespace (dict[str, Any]): The package's ``globals()``; a name looked up once is kept there, so later
            lookups do not come back here.

    Returns:
        tuple[Callable, Callable]: ``(__getattr__, __dir__)``, to assign at the package's top level.

    Example:
        .. testcode::

            import types
            from composer_kd.lazy import lazy_exports

            package = types.ModuleType('geometry')
            package.__getattr__, package.__dir__ = lazy_exports('geometry', {'sqrt': 'math'}, vars(package))
            assert package.sqrt(9.0) == 3.0 and 'sqrt' in dir(package)
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f'module {package!r} has no attribute {name!r}')
        module = importlib.import_module(exports[name])
        value = module if exports[name] == f'{package}.{name}' else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


class ModuleAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import finder under which a module's former dotted path imports the module where it lives now.

    Nothing is imported until a former path is: then ``sys.modules`` holds the module itself under both names, so
    ``from <former path> import name``, pickles that name the former path, and ``isinstance`` all see one module.

    Args:
        aliases (Mapping[str, str]): ``{former path: current path}``.

    Example:
        .. testcode::

            import sys
            from composer_kd.lazy import ModuleAliases

            aliases = ModuleAliases({'old_json_name': 'json'})
            sys.meta_path.append(aliases)
            import old_json_name
            import json
            assert old_json_name is json
            sys.meta_path.remove(aliases)
            del sys.modules['old_json_name']
    """

    def __init__(self, aliases: Mapping[str, str]):
        self.aliases = dict(aliases)

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in self.aliases:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module, replaced in exec_module

    def exec_module(self, module: Any) -> None:
        # The import system takes whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module(self.aliases[module.__name__])
