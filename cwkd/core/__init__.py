"""The method: feature hooks, layer pairing, aligners, losses, the distiller and alpha. Names no task."""
