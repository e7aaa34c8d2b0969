create role "{{name}}" with login password '{{password}}' valid until '{{expiration}}' in role ci_reader;
