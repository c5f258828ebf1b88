"""What the screen asks of a session, one module per concept: each a set of methods on the session's state
(`inspector.state.SessionState`) that `inspector.session.Session` gathers. Every number comes from the core."""
