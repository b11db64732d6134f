"""The launcher's parts: config, tracking, small records, and the phases of a run."""
