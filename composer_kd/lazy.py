"""Packages whose exported names are imported on first use (PEP 562), so that importing the package is cheap.

``import composer_kd`` and the ``composer-kd`` command's ``--help`` load neither torch nor Composer: each name
of ``composer_kd.__all__`` is imported from its module the first time it is looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ['lazy_exports']


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
