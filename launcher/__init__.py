"""Driver side: compose and validate the config, place workers on Ray, run and report."""
