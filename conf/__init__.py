"""prefopt's Hydra configs. This folder is shipped inside the package as ``prefopt.conf`` (see pyproject.toml), where
the installed ``prefopt`` command finds it through Hydra's ``pkg://prefopt.conf`` search path."""
