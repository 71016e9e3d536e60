"""Stand-ins and fixtures for the Merge Board tests: tiny ldm-layout models written as real
checkpoints, and small faithful copies of the A1111 / Forge module surface the board uses."""
