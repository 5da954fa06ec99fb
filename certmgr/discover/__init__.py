"""`certmgr discover`: what every POP's nginx really serves, and which certificates nobody manages.

nginxconf (parse `nginx -T` with crossplane) → collect (SSH, read certificates, handshakes) →
model (the fleet report) → render (table, JSON) / stub (inventory TOML) / state (for `scan`).
"""
