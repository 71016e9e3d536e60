"""What both features need to know about the host they run in: which WebUI it is (``detect``) and
how an X/Y/Z axis is registered into its live ``xyz_grid`` script (``xyz``). Nothing here knows
about merging or guidance; the features build on it, never the other way round."""
