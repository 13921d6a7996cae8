"""Federated LoRA methods other than ILoRA, one module each; importing the package registers them all.

Every module in this package is imported, so adding a method is adding one file.
"""

from importlib import import_module
from pkgutil import iter_modules

for _module in iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")
