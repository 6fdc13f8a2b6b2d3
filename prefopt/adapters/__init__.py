"""One adapter per model family; each implements :class:`prefopt.policy.PreferencePolicy`."""
