"""Stand-in of Forge's ``modules`` package (only what the Merge Board touches)."""
