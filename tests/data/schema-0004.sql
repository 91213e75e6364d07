CREATE TABLE migrations (
	name VARCHAR NOT NULL, 
	applied_at FLOAT NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE meta (
	"key" VARCHAR NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY ("key")
);
CREATE TABLE roots (
	id INTEGER NOT NULL, 
	path VARCHAR NOT NULL, 
	options TEXT, 
	PRIMARY KEY (id), 
	UNIQUE (path)
);
CREATE TABLE files (
	id INTEGER NOT NULL, 
	path VARCHAR NOT NULL, 
	kind VARCHAR NOT NULL, 
	size INTEGER NOT NULL, 
	mtime FLOAT NOT NULL, 
	sha256 VARCHAR NOT NULL, 
	taken_at FLOAT, 
	taken_offset INTEGER, 
	camera VARCHAR, 
	width INTEGER, 
	height INTEGER, 
	PRIMARY KEY (id), 
	UNIQUE (path)
);
CREATE INDEX ix_files_sha256 ON files (sha256);
CREATE TABLE failures (
	path VARCHAR NOT NULL, 
	reason TEXT NOT NULL, 
	at FLOAT NOT NULL, 
	PRIMARY KEY (path)
);
CREATE TABLE ignored (
	path VARCHAR NOT NULL, 
	at FLOAT NOT NULL, 
	PRIMARY KEY (path)
);
CREATE TABLE items (
	id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, 
	file_id INTEGER NOT NULL, 
	kind VARCHAR NOT NULL, 
	line INTEGER NOT NULL, 
	text TEXT, 
	FOREIGN KEY(file_id) REFERENCES files (id) ON DELETE CASCADE
);
CREATE TABLE sqlite_sequence(name,seq);
CREATE INDEX ix_items_file_id ON items (file_id);
CREATE INDEX ix_items_kind ON items (kind);
CREATE TABLE models (
	id INTEGER NOT NULL, 
	"key" VARCHAR NOT NULL, 
	manifest TEXT NOT NULL, 
	is_default INTEGER NOT NULL, 
	generation INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE ("key")
);
CREATE TABLE vectors (
	item_id INTEGER NOT NULL, 
	model_id INTEGER NOT NULL, 
	vector BLOB NOT NULL, 
	PRIMARY KEY (item_id, model_id), 
	FOREIGN KEY(item_id) REFERENCES items (id) ON DELETE CASCADE, 
	FOREIGN KEY(model_id) REFERENCES models (id) ON DELETE CASCADE
);
