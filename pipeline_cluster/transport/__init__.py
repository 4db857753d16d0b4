"""How processes reach each other: framed, authenticated channels (wire, auth), the root's links to its nodes
(links), and the node server (server)."""
