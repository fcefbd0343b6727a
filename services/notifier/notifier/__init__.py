"""The notifier service: a user view and the welcome e-mail with an activation link."""
