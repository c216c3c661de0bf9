"""End-to-end tests against real peer programs (a Docker engine, other hosts), privileged
and isolated in the session's throwaway namespaces."""
