// Never built: this manifest exists so that cargo fetches the model's crate.
