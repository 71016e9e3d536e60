"""Stand-in of A1111 1.10's ``modules`` package (only what the Merge Board touches)."""
