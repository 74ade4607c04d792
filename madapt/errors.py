"""The one base class of the errors madapt tells a user as a message (the CLI's exit 2), not as a traceback.

Each error stays in the module whose input it judges (ConfigError in config, DataError in data, ...); they all
derive from `UserError`, so the CLI catches them without importing those modules and, through them, torch,
transformers, PEFT or Ray. This module imports nothing.
"""


class UserError(Exception):
    """Bad input, named in the message: the YAML key, the file, the adapter id."""
