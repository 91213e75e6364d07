CREATE TABLE words (
	item_id INTEGER NOT NULL, 
	text TEXT, 
	ocr TEXT, 
	PRIMARY KEY (item_id), 
	FOREIGN KEY(item_id) REFERENCES items (id) ON DELETE CASCADE
);
CREATE VIRTUAL TABLE words_fts USING fts5(text, ocr, content='words', content_rowid='item_id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE 'words_fts_data'(id INTEGER PRIMARY KEY, block BLOB);
CREATE TABLE 'words_fts_idx'(segid, term, pgno, PRIMARY KEY(segid, term)) WITHOUT ROWID;
CREATE TABLE 'words_fts_docsize'(id INTEGER PRIMARY KEY, sz BLOB);
CREATE TABLE 'words_fts_config'(k PRIMARY KEY, v) WITHOUT ROWID;
CREATE TRIGGER words_ai AFTER INSERT ON words BEGIN INSERT INTO words_fts(rowid, text, ocr) VALUES (new.item_id, new.text, new.ocr); END;
CREATE TRIGGER words_ad AFTER DELETE ON words BEGIN INSERT INTO words_fts(words_fts, rowid, text, ocr) VALUES ('delete', old.item_id, old.text, old.ocr); END;
CREATE TRIGGER words_au AFTER UPDATE ON words BEGIN INSERT INTO words_fts(words_fts, rowid, text, ocr) VALUES ('delete', old.item_id, old.text, old.ocr); INSERT INTO words_fts(rowid, text, ocr) VALUES (new.item_id, new.text, new.ocr); END;
