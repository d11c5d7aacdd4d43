"""Tools for developing and measuring datafs (test servers, benchmark helpers):
never imported by the filesystem itself."""
