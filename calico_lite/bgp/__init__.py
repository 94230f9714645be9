"""A BGP-4 speaker (RFC 4271) in asyncio: message codec, session FSM, RIB and best path, route reflection."""
