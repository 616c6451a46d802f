"""Run directories: the layout of runs/<name>/ and the finished run read back from it."""
