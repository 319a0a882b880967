"""Tasks: objects that turn a batch into a dict of losses; the training loop knows only this interface."""
