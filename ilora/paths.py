"""Names a user or a remote caller gives that become parts of paths: each must stay a plain name.

A run id, a benchmark's name, a dataset, model or method name ends up as a file or directory name
under the directory it belongs to (``<out_dir>/<run_id>/``, ``results/tables/<preset>/<benchmark>.md``);
a separator, ``..`` or an absolute path in one would write outside it. Directories the user names on
their own command line (``out_dir``, ``--results-dir``, ``export --out``) are theirs to choose and are
only checked to be writable; a remote caller of the Flower app cannot set them (docs/flower.md).
"""

from __future__ import annotations

import re

from ilora.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")
MAX_NAME_LENGTH = 128


def is_plain_name(value: object) -> bool:
    """Letters, digits and ``. _ + = -``, not starting with a dot or a dash, no ``..``, at most 128 characters."""
    return (isinstance(value, str) and len(value) <= MAX_NAME_LENGTH and ".." not in value
            and NAME_PATTERN.fullmatch(value) is not None)


def check_name(key: str, value: object) -> None:
    """Raise a one-line ``ConfigError`` unless ``value`` is a plain name (it becomes a file or directory name)."""
    if not is_plain_name(value):
        raise ConfigError(f"{key} {value!r} must be a plain name (letters, digits and . _ + = -, at most "
                          f"{MAX_NAME_LENGTH} characters, not starting with . or -, no path separator or '..')")
