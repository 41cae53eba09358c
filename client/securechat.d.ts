// securechat client library types
