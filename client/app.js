// securechat page
