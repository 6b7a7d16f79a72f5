"""Operations: the admin endpoint (health, metrics, status page), logging and systemd."""
