"""One planner per command; a command never imports another command."""
