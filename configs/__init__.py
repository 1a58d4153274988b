"""Training configurations: each module has get_config() -> ConfigDict."""
