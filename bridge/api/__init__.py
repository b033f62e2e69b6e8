"""The admin HTTP API: `app.create_app(settings)` (routes in `routes`, `backend`, `health`), run by `server`
(`provbridge api`, or a child process of `provbridge serve`). Its tokens: bridge/ops/admin_tokens.py."""
