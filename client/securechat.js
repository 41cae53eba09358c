// securechat client library
