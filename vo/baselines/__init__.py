"""Reference methods no network produced: :mod:`.classical`, a classical monocular VO (OpenCV + numpy)."""
