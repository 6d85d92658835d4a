"""The example configs, installed as ``omnimask.configs`` (``<group>/<name>.yaml``) and read
through ``omnimask.config.packaged_config``."""
