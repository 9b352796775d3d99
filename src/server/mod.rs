//! Sockets, tasks, concurrency and shutdown.
