-- Version 6: each coverage report's capture mode (off, monitor, enforce; NULL before capture
-- existed) and its monitor-mode plaintext attempts (sources let through), for the dashboard.
ALTER TABLE coverage ADD COLUMN capture_mode TEXT;
ALTER TABLE coverage ADD COLUMN plaintext_attempts BIGINT NOT NULL DEFAULT 0;
